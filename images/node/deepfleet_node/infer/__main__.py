"""`python -m deepfleet_node.infer ...` (and `deepspeed --module deepfleet_node.infer`)."""

if __name__ == "__main__":
    from deepfleet_node._log import exit_after_success
    from deepfleet_node.infer.cli import main

    main()
    exit_after_success()
