"""The billing service (an example): its settings come from secretsd."""
