"""DICOM in and out: series to volumes, SUV from PET headers, RTSTRUCT and DICOM-SEG, DICOMweb."""
