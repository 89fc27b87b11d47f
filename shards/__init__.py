"""Data stage: synthetic / ISIC images -> lesion-level splits -> WebDataset shards -> DDP loaders.

Modules: ``synth`` (procedural lesions), ``ingest`` (ISIC layouts and what is skipped),
``split`` (by lesion), ``pack`` (shards + manifests), ``stream`` (exactly-once distribution),
``loader`` (image DataLoaders), ``preview`` (grid PNG). Nothing is imported here so that
``import shards.synth`` stays light for pool workers.
"""
