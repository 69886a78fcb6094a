"""The traffic simulator: drives a real server like the mobile backend and draws what users do."""
