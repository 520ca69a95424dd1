"""`python -m orchestrator` is `spotune` (one module object, so global options reach the commands)."""
from orchestrator.cli import main

main()
