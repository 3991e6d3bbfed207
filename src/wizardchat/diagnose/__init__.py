"""`doctor` and `bench`: what this machine and build can do, measured."""
