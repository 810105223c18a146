"""Rewards written in Python: loading `module:function` specs and calling them in an isolated process."""
