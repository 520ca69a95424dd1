"""Errors the user caused or can fix: the CLI prints their message as one line and exits 2."""


class UserError(Exception):
    exit_code = 2
