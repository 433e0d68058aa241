"""The domain services: secrets, versions, rotation, tokens, policies, identity."""
