"""Named studies: the Santurkar et al. (2018) reproduction and its parts, declared as data."""
