/* The program of the README's quick start: it prints what greeting() returns, ten times a second, forever.
 * greeting() is the function the quick start's patches replace (c-fix.c, rust-fix/).
 *
 * Build: cc -O2 -g -o hello examples/quickstart/hello.c
 */
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) const char *greeting(int n) {
    return n % 2 ? "hello from the original (odd)" : "hello from the original";
}

int main(void) {
    for (int n = 0;; n++) {
        printf("%d %s\n", n, greeting(n));
        fflush(stdout);
        usleep(100 * 1000);
    }
}
