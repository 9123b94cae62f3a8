"""Model cards: one module and one template per kind of published folder."""
