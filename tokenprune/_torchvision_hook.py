"""Run tokenprune's torchvision shim right before the first ``import torchvision``.

Executed (not imported) at interpreter start-up by the ``tokenprune-torchvision.pth`` line
that ``tokenprune compat install`` writes into site-packages. It only installs a
meta-path finder; nothing heavy is imported until some code imports torchvision — then the
finder removes itself, runs :func:`tokenprune.compat.ensure_torchvision_importable`, and
lets the normal import proceed. This covers programs that import timm/transformers before
tokenprune gets a chance to (``accelerate launch`` imports timm in its launcher).
"""

import sys


class _TokenpruneTorchvisionHook:
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (runs before typing is imported)
        if name != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            import tokenprune.compat

            tokenprune.compat.ensure_torchvision_importable()
        except Exception as error:  # never break the import that triggered us
            sys.stderr.write(f"tokenprune torchvision hook: {type(error).__name__}: {error}\n")
        return None


if not any(type(finder).__name__ == "_TokenpruneTorchvisionHook" for finder in sys.meta_path):
    sys.meta_path.insert(0, _TokenpruneTorchvisionHook())
