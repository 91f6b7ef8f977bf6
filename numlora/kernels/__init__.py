"""CPU kernels: plain ``@njit`` functions over arrays.

No validation, no classes, no allocation beyond scratch space; results go to ``out``
arrays. Importing a module of this package imports numba, but compiles nothing: each
kernel compiles on its first call (and is cached on disk, see ``numlora._config``).
The functional layer (``numlora.ops``, ``numlora.nf4``) imports these modules lazily.
"""

# numba is imported first by _jit (without SciPy; see _jit.import_numba), whichever kernel
# module is imported.
from . import _jit  # noqa: F401
