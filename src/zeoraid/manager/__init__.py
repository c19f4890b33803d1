"""zeoraid-manager: the operator's command line for a zeoraid server.

``cli`` holds the commands and exit codes, ``client`` the admin protocol
client.
"""
