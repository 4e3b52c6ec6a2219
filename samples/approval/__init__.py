"""An expense claim that waits for a manager's approval."""
