"""lmkit-retrieval: a RETRO-style retrieval datastore for lmkit.

:class:`~lmkit_retrieval.store.Datastore` (build with :func:`~lmkit_retrieval.store.build_store`),
the frozen :class:`~lmkit_retrieval.encoder.ChunkEncoder`, and the faiss
:class:`~lmkit_retrieval.index.IndexSpec`. The ``retrieval`` verb is registered by
:mod:`lmkit_retrieval.plugin`.
"""
from lmkit_retrieval.encoder import ChunkEncoder, model_fingerprint
from lmkit_retrieval.index import INDEX_KINDS, IndexSpec, set_threads
from lmkit_retrieval.store import Datastore, build_store, document_ids

__version__ = "0.1.0"

__all__ = ["ChunkEncoder", "Datastore", "INDEX_KINDS", "IndexSpec", "build_store", "document_ids",
           "model_fingerprint", "set_threads"]
