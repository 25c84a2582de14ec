"""Storage backends. Each kind lives in its own sub-package and implements the Protocols
in ``base.py``; no backend imports grpc or the generated protobuf code."""
