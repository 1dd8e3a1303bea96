import os
import sys

# Tests see one CPU device unless they start a subprocess with more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
