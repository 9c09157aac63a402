"""VLM adapters, partitioners, attention taps and relevance scorers.

Modules here may use transformers, timm and open_clip, but import them inside functions,
so that importing this package (which registers every adapter) stays cheap.
"""

from tokenprune._autoload import import_submodules

import_submodules(__name__, __path__)
