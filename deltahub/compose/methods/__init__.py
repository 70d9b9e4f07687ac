"""deltahub.compose.methods"""
