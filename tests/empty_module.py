"""A module that defines no Step or Flow."""

VALUE = 1
