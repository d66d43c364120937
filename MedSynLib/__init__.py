"""MedSyn: text-guided, anatomy-aware synthesis of 3D chest CT."""
