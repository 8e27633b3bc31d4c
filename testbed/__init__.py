"""Small CLIPs trained and backdoored here, so that defenses can be measured honestly."""
