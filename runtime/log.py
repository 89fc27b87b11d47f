"""Console logging with one format for every stage (rank-aware under DDP)."""

from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger().handlers and not logger.handlers:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LESION_VQ_LOG", "INFO"))
        logger.propagate = False
    return logger
