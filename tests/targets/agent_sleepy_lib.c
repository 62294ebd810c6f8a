// A library whose constructor sleeps 100 ms (usleep → clock_nanosleep): injecting it exercises the
// restart-block guard of REMOTE-CALL.md (the callee's own sleep replaces the hijacked thread's
// restart_block, so the thread must return through its signal frame and re-issue its sleep).
#include <unistd.h>

__attribute__((constructor)) static void sleepy_init(void) { usleep(100000); }
