"""The `selfpatch` command (`main`: a dispatcher to each tool's own command module) and the error contract every
command line of the project shares (`errors`)."""
