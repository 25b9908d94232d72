"""`python -m jaxllm ...` runs the `jaxllm` command."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
