import atexit
import os
import shutil
import sys
import tempfile

# Tests see one CPU device unless they start a subprocess with more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# Binaries run as subprocesses keep their JAX compilation cache ($XDG_CACHE_HOME/opt_jax/...) in a
# folder of this test session, never in the user's home; the demo corpus stays in the user's
# download cache (fetched once, reused by every session).
_base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
os.environ.setdefault("OPT_JAX_CORPUS_DIR", os.path.join(_base, "opt_jax", "corpus"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="opt_jax-test-cache-")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
