"""grpo_harness: the command line and training applications built on grpo_core and adapters."""
