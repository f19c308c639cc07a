"""JSON serialization for durable stores: register event and entity types by name and version.

See :class:`Transcoder`. Nothing is ever pickled: decoding builds only registered classes.
"""

from . import _claim_public_names
from ._serialization import EncodedEntity as EncodedEntity
from ._serialization import EncodedEvent as EncodedEvent
from ._serialization import Transcoder as Transcoder
from ._serialization import Upcaster as Upcaster
from ._serialization import default_converter as default_converter

__all__ = ["EncodedEntity", "EncodedEvent", "Transcoder", "Upcaster", "default_converter"]

_claim_public_names(globals(), __all__, __name__)
