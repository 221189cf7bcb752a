"""xdplb: XDP load balancer for PACS/DICOM servers, with a Python controller."""

__version__ = "0.1.0"
