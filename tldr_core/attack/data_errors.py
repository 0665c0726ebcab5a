"""The errors of loading a data set, raised by `data` (names, split sizes, files) and `images` (image
folders); a module of their own so that neither of those imports the other for them."""


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where we looked (the message says where, and which flag fixes it)."""


class DataError(ValueError):
    """An unknown data set name, an impossible split size, or unusable files."""
