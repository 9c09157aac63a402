"""Built-in budget allocators and selectors: pure tensor code, one strategy per module.

Modules here import only torch and the ``tokenprune`` core (never transformers, timm or
open_clip). Each registers itself with ``@register_allocator`` / ``@register_selector``;
importing this package imports them all.
"""

from tokenprune._autoload import import_submodules

import_submodules(__name__, __path__)
