"""What protects the data owner: activation noise, its accounting, label obfuscation, secrets."""
