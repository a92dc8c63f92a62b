"""`python -m deepfleet_node.train ...` (and `deepspeed --module deepfleet_node.train`)."""

if __name__ == "__main__":
    from deepfleet_node._log import exit_after_success
    from deepfleet_node.train.loop import main

    main()
    exit_after_success()
