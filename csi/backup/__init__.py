"""Backups: volumes copied out of their backend into a repository, in full and then
incrementally, and restored onto any backend that can fill volumes (Cinder's backup
service). ``store`` keeps named objects (a directory, an S3 bucket); ``repository`` is
the format on top (chunks, manifests, collection); ``engine`` moves data between
backends and repositories."""
