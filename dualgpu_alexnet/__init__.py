"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) split over two MPI processes, in pure NumPy."""

__version__ = "0.1.0"
