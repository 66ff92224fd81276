# The one place the version lives; setup.cfg reads it (attr:), mamba4rec re-exports it.
__version__ = "0.1.0"
