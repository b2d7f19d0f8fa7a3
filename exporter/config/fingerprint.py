"""Short stable hashes that label a configuration (or one provider's prices) in metrics."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def config_fingerprint(config: BaseModel) -> str:
    """A short stable hash (12 hex digits) of a config model's canonical JSON form.

    Equal configurations give equal fingerprints across processes, so it can label the
    configuration (or, for a ProviderConfig, that provider's settings) in metrics and logs.
    It hashes names of key variables, never their values.
    """
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return _short_hash(canonical)
