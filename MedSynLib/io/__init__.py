"""Files: `volumes` (NIfTI / NRRD / DICOM reading and the generated result's files),
`dicom` (DICOM series and the real chest CT shipped for tests), `preview` (PNG previews)."""
