"""Training data: `prepare` (CTs + reports -> case files), `prepared` (the case-file format and
its reader), `datasets` (the torch Datasets that stream training samples), `segmentation`
(the anatomy segmenters prepare uses)."""
