"""A shipping quote: a retried segment, a fallback and a final step."""
