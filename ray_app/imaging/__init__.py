"""Imaging: DICOM studies -> disc volumes -> ResNet18 embeddings -> SVM / NSK-SVM, and a 2D CNN.

Pure Python (pydicom, numpy, torch, scikit-learn) except the modules named `*_job` and `cnn`'s
Ray Train layer, which import Ray lazily.
"""
