"""deepfleet's command line: `main` assembles the parser from one module per command group."""
