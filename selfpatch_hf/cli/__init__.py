"""The `selfpatch` command (`main`) and the error contract every command line of the project shares (`errors`)."""
