"""The machines as the user names them: NODES words, the SSH config, cluster.yaml."""
