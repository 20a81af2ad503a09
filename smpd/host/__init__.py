"""The host smpd runs on, and acting safely on it.

What is here: the names of everything smpd creates (``names``), acting only on what the
invoking user provably owns (``trust``), files a user names (``files``), facts about the
host's capacity and cores (``hostinfo``), and what every process of ours sets on itself
(``proc``). It imports only the parsers and errors below it.
"""
