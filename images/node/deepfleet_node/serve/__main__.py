"""`python -m deepfleet_node.serve ...`."""

if __name__ == "__main__":
    from deepfleet_node._log import exit_after_success
    from deepfleet_node.serve.cli import main

    main()
    exit_after_success()
