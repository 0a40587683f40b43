"""bnlab: Batch Normalization from first principles, and why it helps optimization.

Importing bnlab is cheap: it compiles no kernels and imports no plotting library.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
