"""Who is calling and what they may do: API keys and their cache, authentication, attribution to a
feature and an end user, the scopes of each endpoint class, and the services handed to the handlers."""
