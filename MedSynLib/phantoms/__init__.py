"""Synthetic chest phantoms: `chest` (one phantom CT with lobes, airway, vessels and findings
from a seed) and `cases` (folders of them with reports, for `prepare`)."""
