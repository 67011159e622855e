"""The upstream's wire format: what a request asks for and what its answer reports (model, usage, service
tier, errors), read behind one protocol (`dialect`), for OpenAI's format (`openai`), and the metered
endpoints as data (`endpoints`). The relays move bytes; the dialect reads them."""
