package collector

// PeerHold is peerHold, for the tests.
const PeerHold = peerHold
