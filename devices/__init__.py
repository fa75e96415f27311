"""Device profiles, cross-built llama.cpp, transports and deployment."""
